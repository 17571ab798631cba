//! Sign-up, login and sessions. A sign-up creates a tenant, its owner and a free subscription in one
//! transaction; a login returns a session token for the portal and the API.

use std::time::Duration;

use chrono::{DateTime, Utc};
use plinth_core::Role;
use plinth_core::api::{LoginRequest, Membership, Session, SignupRequest, Tenant, User};
use plinth_core::id::{SessionId, TenantId, UserId};
use sea_orm::sea_query::{Expr, ExprTrait, Func};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::audit::Who;
use crate::cache::{Cache, Quota};
use crate::entity::{TenantScoped, memberships, sessions, tenants, users};
use crate::passwords::Lane;
use crate::{Result, Store, StoreError, row_security, secret};

/// How long a login session lasts.
pub const SESSION_LIFETIME: chrono::Duration = chrono::Duration::days(30);
/// Login attempts per email from one client network: 10 at once, then one every 6 seconds.
const LOGIN_QUOTA: Quota = Quota {
    per_minute: 10,
    burst: 10,
};
/// Login attempts per email from networks it has not logged in from: bounds guessing spread over
/// many networks. Networks the account logged in from before are not held to it, so guessing from
/// elsewhere cannot lock the owner out of their usual ones (one network's attempts stop at
/// [`LOGIN_QUOTA`] and spend nothing here).
const LOGIN_EMAIL_QUOTA: Quota = Quota {
    per_minute: 20,
    burst: 20,
};
/// The shared-cache key of the limit on sign-ups and logins from networks new to their account, all
/// addresses together.
pub const UNAUTHENTICATED_KEY: &str = "global:unauthenticated";
/// The shared-cache key of the limit on logins from networks their account used before, all addresses
/// together: [`RETURNING_MULTIPLE`] times the newcomers' limit. Anyone can make networks known to
/// accounts of their own; this bounds the password checks such logins can ask for.
pub const RETURNING_KEY: &str = "global:returning";
/// How many times the newcomers' limit returning users' logins share.
const RETURNING_MULTIPLE: u32 = 4;
/// How long a network an account logged in from stays known to it.
const KNOWN_NETWORK_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The limit on logins to `email` from one network. Its prefix is its own: an email is the
/// client's to choose (`owner@example.com:v4:192.0.2.1` is one), and a key that another limit's could
/// spell would let anyone spend the owner's limit on their own network.
fn login_network_key(email: &str, network: &str) -> String {
    format!("login-network:{network}:{email}")
}

/// The limit on logins to `email` from networks new to it.
fn login_email_key(email: &str) -> String {
    format!("login-email:{email}")
}

/// Lower-cases and checks an email address. Deliberately loose: the only real check is a confirmation
/// mail, which comes with invitations.
pub(crate) fn normalise_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
        })
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email)
    } else {
        Err(StoreError::invalid("email: not a valid email address"))
    }
}

fn validate_password(password: &str) -> Result<()> {
    match password.chars().count() {
        0..10 => Err(StoreError::invalid("password: must be at least 10 characters")),
        10..=1024 => Ok(()),
        _ => Err(StoreError::invalid("password: must be at most 1024 characters")),
    }
}

pub(crate) fn validate_name(field: &str, name: &str) -> Result<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(StoreError::invalid(format!(
            "{field}: must be 1-100 printable characters"
        )));
    }
    Ok(name.to_owned())
}

pub(crate) fn to_user(model: &users::Model) -> Result<User> {
    Ok(User {
        id: parse_id(&model.id)?,
        email: model.email.clone(),
        created_at: model.created_at,
    })
}

pub(crate) fn to_tenant(model: tenants::Model, plan: String) -> Result<Tenant> {
    Ok(Tenant {
        id: parse_id(&model.id)?,
        name: model.name,
        plan,
        created_at: model.created_at,
    })
}

pub(crate) fn parse_id<T: std::str::FromStr>(raw: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    raw.parse()
        .map_err(|err: T::Err| StoreError::Internal(format!("corrupt id in database: {err}")))
}

pub(crate) fn parse_role(raw: &str) -> Result<Role> {
    raw.parse()
        .map_err(|err: String| StoreError::Internal(format!("corrupt role in database: {err}")))
}

async fn hash_password(password: String) -> Result<String> {
    crate::passwords::run(Lane::Open, move || secret::hash_password(&password))
        .await?
        .map_err(StoreError::Internal)
}

async fn verify_password(lane: Lane, password: String, phc: Option<String>) -> Result<bool> {
    // An unknown email still costs one full verification, against a real hash made once, so response
    // time does not reveal which emails have accounts.
    static DUMMY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        secret::hash_password("no account has this password").unwrap_or_default()
    });
    crate::passwords::run(lane, move || {
        let matched = secret::verify_password(&password, phc.as_deref().unwrap_or(DUMMY.as_str()));
        matched && phc.is_some()
    })
    .await
}

impl Store {
    /// Creates a tenant, its owner and a free subscription, and logs the owner in.
    pub async fn signup(&self, request: &SignupRequest, who: &Who) -> Result<Session> {
        let email = normalise_email(&request.email)?;
        validate_password(&request.password)?;
        let tenant_name = validate_name("tenant_name", &request.tenant_name)?;
        if users::Entity::find()
            .filter(users::Column::Email.eq(&email))
            .one(self.db())
            .await?
            .is_some()
        {
            return Err(StoreError::EmailTaken);
        }
        let password_hash = hash_password(request.password.clone()).await?;
        let now = Utc::now();
        let tenant_id = TenantId::new();
        let user_id = UserId::new();

        let txn = self.write_transaction().await?;
        tenants::ActiveModel {
            id: Set(tenant_id.to_string()),
            name: Set(tenant_name),
            created_at: Set(now),
        }
        .insert(&txn)
        .await?;
        let inserted = users::ActiveModel {
            id: Set(user_id.to_string()),
            email: Set(email.clone()),
            password_hash: Set(password_hash),
            is_platform_admin: Set(false),
            created_at: Set(now),
        }
        .insert(&txn)
        .await;
        match inserted {
            Err(err) if crate::is_unique_violation(&err) => return Err(StoreError::EmailTaken),
            other => other?,
        };
        memberships::ActiveModel {
            tenant_id: Set(tenant_id.to_string()),
            user_id: Set(user_id.to_string()),
            role: Set(Role::Owner.as_str().to_owned()),
            created_at: Set(now),
        }
        .insert(&txn)
        .await?;
        Self::create_free_subscription(&txn, &tenant_id, now).await?;
        crate::audit::record(
            &txn,
            Some(&tenant_id),
            &who.as_actor(user_id.as_str()),
            "tenant.signup",
            None,
            serde_json::json!({ "email": email }),
        )
        .await?;
        let token = create_session(&txn, &user_id, &tenant_id, now, now + SESSION_LIFETIME).await?;
        txn.commit().await?;
        self.session_view(token, &user_id, &tenant_id).await
    }

    /// Checks a password and opens a session in the requested tenant (or the user's oldest membership).
    /// Attempts per email are rate limited through the shared cache, so guessing holds across replicas:
    /// per email from the client's network (`network`: an IPv4 address or an IPv6 /48), then, from
    /// networks the account has not logged in from before, per email and within `everyone_new`, the
    /// limit sign-ups share with every such attempt (key [`UNAUTHENTICATED_KEY`]); from networks it
    /// used before, within a limit four times that, shared by all such logins ([`RETURNING_KEY`]),
    /// and past that as a newcomer's. Someone guessing from elsewhere, or flooding from many
    /// addresses, locks the owner out of neither their network nor those they used before unless
    /// both shared limits are spent, and returning users' password checks go first (the HTTP edge also
    /// limits attempts per client address). Every attempt is audited: a success in
    /// the session's tenant; a failure in the user's own (oldest) tenant, or the platform's log for an
    /// unknown email. Not in every tenant the user belongs to: a tenant that added someone as a member
    /// must not learn where that person's failed logins come from.
    pub async fn login(
        &self,
        cache: &dyn Cache,
        request: &LoginRequest,
        who: &Who,
        network: &str,
        everyone_new: Quota,
    ) -> Result<Session> {
        let email = normalise_email(&request.email).map_err(|_| StoreError::InvalidLogin)?;
        let known_key = format!("login-known:{email}:{network}");
        let refused = |decision: crate::cache::RateDecision| {
            StoreError::TooManyAttempts(decision.retry_after.max(Duration::from_secs(1)))
        };
        let this_network = cache
            .rate_limit(&login_network_key(&email, network), LOGIN_QUOTA)
            .await?;
        if !this_network.allowed {
            return Err(refused(this_network));
        }
        // Unknown when the cache cannot say: the stricter limits apply.
        let mut known = cache.get(&known_key).await.ok().flatten().is_some();
        if known {
            let returning = Quota {
                per_minute: everyone_new.per_minute.saturating_mul(RETURNING_MULTIPLE),
                burst: everyone_new.burst.saturating_mul(RETURNING_MULTIPLE),
            };
            // Spent (by logins to accounts an attacker made its networks known to): this one is
            // treated as a newcomer's, not refused, so draining this limit alone keeps nobody out.
            known = cache.rate_limit(RETURNING_KEY, returning).await?.allowed;
        }
        if !known {
            for (key, quota) in [
                (login_email_key(&email), LOGIN_EMAIL_QUOTA),
                (UNAUTHENTICATED_KEY.to_owned(), everyone_new),
            ] {
                let decision = cache.rate_limit(&key, quota).await?;
                if !decision.allowed {
                    return Err(refused(decision));
                }
            }
        }
        let user = users::Entity::find()
            .filter(users::Column::Email.eq(&email))
            .one(self.db())
            .await?;
        let phc = user.as_ref().map(|user| user.password_hash.clone());
        let lane = if known { Lane::Known } else { Lane::Open };
        if !verify_password(lane, request.password.clone(), phc).await? {
            self.audit_failed_login(user.as_ref(), &email, who).await?;
            return Err(StoreError::InvalidLogin);
        }
        let user = user.ok_or(StoreError::InvalidLogin)?;
        let mut query = memberships::Entity::find().filter(memberships::Column::UserId.eq(&user.id));
        if let Some(tenant) = &request.tenant_id {
            query = query.filter(memberships::Column::TenantId.eq(tenant.as_str()));
        }
        let membership = query
            .order_by_asc(memberships::Column::CreatedAt)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("membership in that tenant"))?;
        let user_id: UserId = parse_id(&user.id)?;
        let tenant_id: TenantId = parse_id(&membership.tenant_id)?;
        let txn = self.write_transaction().await?;
        let now = Utc::now();
        let token = create_session(&txn, &user_id, &tenant_id, now, now + SESSION_LIFETIME).await?;
        crate::audit::record(
            &txn,
            Some(&tenant_id),
            &who.as_actor(user_id.as_str()),
            "login.succeeded",
            Some(user_id.as_str()),
            serde_json::json!({ "email": email }),
        )
        .await?;
        txn.commit().await?;
        if let Err(err) = cache.set(&known_key, b"1", KNOWN_NETWORK_TTL).await {
            tracing::warn!(error = %err, "cannot remember the network a login came from");
        }
        self.session_view(token, &user_id, &tenant_id).await
    }

    /// Moves a signed-in user to another tenant they belong to: a session there that ends when the
    /// current one would (switching never lengthens a session), and the current session ended.
    pub async fn switch_tenant(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        to: &TenantId,
        who: &Who,
    ) -> Result<Session> {
        // Crosses tenants by purpose: ends a session in one and opens one in the other.
        row_security::across_tenants(self.switch_between_tenants(tenant, session, to, who)).await
    }

    async fn switch_between_tenants(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        to: &TenantId,
        who: &Who,
    ) -> Result<Session> {
        let now = Utc::now();
        let current = sessions::Entity::find_in(tenant)
            .filter(sessions::Column::Id.eq(session.as_str()))
            .one(self.db())
            .await?
            .filter(|s| s.revoked_at.is_none() && s.expires_at > now)
            .ok_or(StoreError::NotFound("session"))?;
        memberships::Entity::find_in(to)
            .filter(memberships::Column::UserId.eq(&current.user_id))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("membership in that tenant"))?;
        let user_id: UserId = parse_id(&current.user_id)?;
        let txn = self.write_transaction().await?;
        let token = create_session(&txn, &user_id, to, now, current.expires_at).await?;
        let token_hash = current.token_hash.clone();
        // Ended only if nothing ended it meanwhile (a logout, a revocation): then there is no switch.
        let ended = sessions::Entity::update_many()
            .col_expr(sessions::Column::RevokedAt, sea_orm::sea_query::Expr::value(now))
            .filter(sessions::Column::Id.eq(&current.id))
            .filter(sessions::Column::RevokedAt.is_null())
            .exec(&txn)
            .await?;
        if ended.rows_affected != 1 {
            return Err(StoreError::NotFound("session"));
        }
        crate::audit::record(
            &txn,
            Some(to),
            &who.as_actor(user_id.as_str()),
            "session.switched",
            Some(user_id.as_str()),
            serde_json::json!({ "from_tenant": tenant.as_str() }),
        )
        .await?;
        txn.commit().await?;
        self.credentials.forget(&token_hash).await;
        self.session_view(token, &user_id, to).await
    }

    /// The tenants `user` belongs to, oldest membership first.
    pub async fn memberships(&self, user: &UserId) -> Result<Vec<Membership>> {
        // A person's memberships span tenants by purpose (the organisation switcher).
        row_security::across_tenants(self.memberships_in_every_tenant(user)).await
    }

    async fn memberships_in_every_tenant(&self, user: &UserId) -> Result<Vec<Membership>> {
        let rows = memberships::Entity::find()
            .filter(memberships::Column::UserId.eq(user.as_str()))
            .order_by_asc(memberships::Column::CreatedAt)
            .all(self.db())
            .await?;
        let names = tenants::Entity::find()
            .filter(tenants::Column::Id.is_in(rows.iter().map(|row| row.tenant_id.clone())))
            .all(self.db())
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(Membership {
                    tenant_name: names
                        .iter()
                        .find(|t| t.id == row.tenant_id)
                        .map(|t| t.name.clone())
                        .unwrap_or_default(),
                    role: parse_role(&row.role)?,
                    tenant_id: parse_id(&row.tenant_id)?,
                })
            })
            .collect()
    }

    async fn audit_failed_login(&self, user: Option<&users::Model>, email: &str, who: &Who) -> Result<()> {
        let detail = serde_json::json!({ "email": email });
        let Some(user) = user else {
            return self.audit(None, who, "login.failed", None, detail).await;
        };
        let own = memberships::Entity::find()
            .filter(memberships::Column::UserId.eq(&user.id))
            .order_by_asc(memberships::Column::CreatedAt)
            .one(self.db())
            .await?;
        let tenant: Option<TenantId> = own.map(|m| parse_id(&m.tenant_id)).transpose()?;
        self.audit(tenant.as_ref(), who, "login.failed", Some(&user.id), detail)
            .await
    }

    /// Ends the session that `token` belongs to.
    pub async fn logout(&self, tenant: &TenantId, session: &SessionId) -> Result<()> {
        let row = sessions::Entity::find_in(tenant)
            .filter(sessions::Column::Id.eq(session.as_str()))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("session"))?;
        self.credentials.forget(&row.token_hash).await;
        let mut model: sessions::ActiveModel = row.into();
        model.revoked_at = Set(Some(Utc::now()));
        model.update(self.db()).await?;
        Ok(())
    }

    pub async fn tenant(&self, tenant: &TenantId) -> Result<Tenant> {
        let row = tenants::Entity::find_by_id(tenant.as_str())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("tenant"))?;
        let plan = self.subscription(tenant).await?.plan.id;
        to_tenant(row, plan)
    }

    /// Tenants for the operators' directory, newest first, at most `limit`: those whose name or id
    /// contains `query`, or with a member whose email does (every tenant when there is no query).
    pub async fn tenant_directory(&self, query: Option<&str>, limit: u64) -> Result<Vec<Tenant>> {
        let mut select = tenants::Entity::find().order_by_desc(tenants::Column::CreatedAt);
        if let Some(query) = query.map(str::trim).filter(|q| !q.is_empty()) {
            let pattern = format!("%{}%", query.to_lowercase().replace(['%', '_'], ""));
            fn lower(column: impl sea_orm::sea_query::IntoColumnRef) -> Expr {
                Expr::expr(Func::lower(Expr::col(column)))
            }
            let member_tenants: Vec<String> = memberships::Entity::find()
                .filter(
                    memberships::Column::UserId.in_subquery(
                        sea_orm::sea_query::Query::select()
                            .column(users::Column::Id)
                            .from(users::Entity)
                            .and_where(lower(users::Column::Email).like(pattern.clone()))
                            .to_owned(),
                    ),
                )
                .limit(limit)
                .all(self.db())
                .await?
                .into_iter()
                .map(|m| m.tenant_id)
                .collect();
            select = select.filter(
                Condition::any()
                    .add(lower(tenants::Column::Name).like(pattern.clone()))
                    .add(lower(tenants::Column::Id).like(pattern))
                    .add(tenants::Column::Id.is_in(member_tenants)),
            );
        }
        let mut found = Vec::new();
        for row in select.limit(limit).all(self.db()).await? {
            let plan = self.subscription(&parse_id(&row.id)?).await?.plan.id;
            found.push(to_tenant(row, plan)?);
        }
        Ok(found)
    }

    /// Makes `email` a platform operator (marketplace review, payouts, every tenant's audit log).
    ///
    /// A new email gets a new account with `password` (and a tenant of its own). An existing account is
    /// refused unless `promote_existing` is set *and* `password` is that account's password: signup is
    /// open, so whoever registered an email first must not become an operator because someone later
    /// ran this command with it.
    pub async fn create_platform_admin(
        &self,
        email: &str,
        password: &str,
        promote_existing: bool,
        who: &Who,
    ) -> Result<User> {
        let email = normalise_email(email)?;
        let existing = users::Entity::find()
            .filter(users::Column::Email.eq(&email))
            .one(self.db())
            .await?;
        let user = match existing {
            None => {
                let session = self
                    .signup(
                        &SignupRequest {
                            email: email.clone(),
                            password: password.to_owned(),
                            tenant_name: "Platform operators".to_owned(),
                        },
                        who,
                    )
                    .await?;
                users::Entity::find_by_id(session.user.id.as_str())
                    .one(self.db())
                    .await?
                    .ok_or(StoreError::NotFound("user"))?
            }
            Some(user) if !promote_existing => {
                self.audit(
                    None,
                    who,
                    "platform_admin.refused",
                    Some(&user.id),
                    serde_json::json!({
                    "email": email, "reason": "the account exists and promotion was not asked for" }),
                )
                .await?;
                return Err(StoreError::Refused(
                    plinth_core::ErrorCode::EmailTaken,
                    format!(
                        "an account with {email} already exists; to make it a platform admin, pass \
                         --promote-existing with that account's password"
                    ),
                ));
            }
            Some(user) => {
                if !verify_password(Lane::Open, password.to_owned(), Some(user.password_hash.clone())).await?
                {
                    self.audit(
                        None,
                        who,
                        "platform_admin.refused",
                        Some(&user.id),
                        serde_json::json!({
                        "email": email, "reason": "wrong password for the existing account" }),
                    )
                    .await?;
                    return Err(StoreError::InvalidLogin);
                }
                user
            }
        };
        self.set_platform_admin(user, true, who).await
    }

    /// Takes platform-operator rights away from `email`. Its sessions lose them at once on this
    /// replica and within the credential cache TTL on the others.
    pub async fn revoke_platform_admin(&self, email: &str, who: &Who) -> Result<User> {
        let email = normalise_email(email)?;
        let user = users::Entity::find()
            .filter(users::Column::Email.eq(&email))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("user with that email"))?;
        self.set_platform_admin(user, false, who).await
    }

    async fn set_platform_admin(&self, user: users::Model, admin: bool, who: &Who) -> Result<User> {
        let txn = self.write_transaction().await?;
        let was = user.is_platform_admin;
        let mut model: users::ActiveModel = user.into();
        model.is_platform_admin = Set(admin);
        let user = model.update(&txn).await?;
        crate::audit::record(
            &txn,
            None,
            who,
            if admin {
                "platform_admin.grant"
            } else {
                "platform_admin.revoke"
            },
            Some(&user.id),
            serde_json::json!({ "email": user.email, "was_admin": was }),
        )
        .await?;
        txn.commit().await?;
        let user_id: UserId = parse_id(&user.id)?;
        for membership in memberships::Entity::find()
            .filter(memberships::Column::UserId.eq(&user.id))
            .all(self.db())
            .await?
        {
            self.credentials
                .forget_in_tenant(&parse_id(&membership.tenant_id)?, Some(&user_id));
        }
        to_user(&user)
    }

    async fn session_view(
        &self,
        token: (String, DateTime<Utc>),
        user: &UserId,
        tenant: &TenantId,
    ) -> Result<Session> {
        let user_row = users::Entity::find_by_id(user.as_str())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("user"))?;
        let memberships = self.memberships(user).await?;
        let role = memberships
            .iter()
            .find(|m| &m.tenant_id == tenant)
            .map(|m| m.role);
        Ok(Session {
            token: token.0,
            expires_at: token.1,
            user: to_user(&user_row)?,
            tenant: self.tenant(tenant).await?,
            role: role.ok_or(StoreError::NotFound("membership"))?,
            memberships,
        })
    }
}

async fn create_session(
    conn: &impl ConnectionTrait,
    user: &UserId,
    tenant: &TenantId,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<(String, DateTime<Utc>)> {
    let token = secret::new_session_token();
    sessions::ActiveModel {
        id: Set(SessionId::new().to_string()),
        token_hash: Set(secret::token_hash(&token)),
        user_id: Set(user.to_string()),
        tenant_id: Set(tenant.to_string()),
        created_at: Set(now),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
    }
    .insert(conn)
    .await?;
    Ok((token, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(normalise_email("  Ada@Example.COM ").unwrap(), "ada@example.com");
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@example",
            "ada@.com",
            "a da@example.com",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn passwords_need_ten_characters() {
        assert!(validate_password("short").is_err());
        assert!(validate_password("long enough").is_ok());
    }

    /// The rate-limit keys a login spends, recorded.
    #[derive(Debug, Default)]
    struct Spent {
        cache: crate::cache::MemoryCache,
        keys: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Cache for Spent {
        async fn rate_limit(
            &self,
            key: &str,
            quota: Quota,
        ) -> std::result::Result<crate::cache::RateDecision, crate::cache::CacheError> {
            self.keys.lock().unwrap().push(key.to_owned());
            self.cache.rate_limit(key, quota).await
        }
        async fn get(&self, key: &str) -> std::result::Result<Option<Vec<u8>>, crate::cache::CacheError> {
            self.cache.get(key).await
        }
        async fn set(
            &self,
            key: &str,
            value: &[u8],
            ttl: Duration,
        ) -> std::result::Result<(), crate::cache::CacheError> {
            self.cache.set(key, value, ttl).await
        }
        async fn delete(&self, key: &str) -> std::result::Result<(), crate::cache::CacheError> {
            self.cache.delete(key).await
        }
        async fn ping(&self) -> std::result::Result<(), crate::cache::CacheError> {
            self.cache.ping().await
        }
    }

    /// An email is the client's to choose: one spelled like the owner's email and network must not
    /// spend the owner's limit on that network (on Redis a key is one bucket, whatever its quota).
    #[tokio::test]
    async fn an_email_spelled_like_another_limits_key_spends_only_its_own_limits() {
        let (store, _dir) = crate::testing::test_store().await;
        let who = Who::internal(Who::OPERATOR);
        let everyone_new = Quota {
            per_minute: 1_000,
            burst: 1_000,
        };
        let login = async |email: &str, network: &str| {
            let cache = Spent::default();
            let request = LoginRequest {
                email: email.into(),
                password: "not the password".into(),
                tenant_id: None,
            };
            let refused = store.login(&cache, &request, &who, network, everyone_new).await;
            assert!(matches!(refused, Err(StoreError::InvalidLogin)), "{refused:?}");
            cache.keys.into_inner().unwrap()
        };
        let owners = login("owner@example.com", "v4:192.0.2.1").await;
        for crafted in [
            "owner@example.com:v4:192.0.2.1",
            "owner@example.com:v4:192.0.2.1:v4:198.51.100.9",
        ] {
            for network in ["v4:198.51.100.9", "v4:192.0.2.1"] {
                let spent = login(crafted, network).await;
                assert!(
                    !spent
                        .iter()
                        .any(|key| owners.contains(key) && !key.starts_with("global:")),
                    "{crafted} from {network} spent {spent:?}; the owner's are {owners:?}"
                );
            }
        }
    }

    /// Anyone can make networks known to accounts of their own and spend the returning users' shared
    /// limit: a returning login then counts as a newcomer's rather than being refused, so only both
    /// limits spent keep an owner out.
    #[tokio::test]
    async fn a_spent_returning_limit_makes_a_returning_login_a_newcomers_not_a_refusal() {
        let (store, _dir) = crate::testing::test_store().await;
        let cache = crate::cache::MemoryCache::new();
        let who = Who::internal(Who::OPERATOR);
        store
            .signup(
                &SignupRequest {
                    email: "owner@example.com".into(),
                    password: "correct horse battery".into(),
                    tenant_name: "Acme".into(),
                },
                &who,
            )
            .await
            .unwrap();
        let everyone_new = Quota {
            per_minute: 3,
            burst: 3,
        };
        let request = LoginRequest {
            email: "owner@example.com".into(),
            password: "correct horse battery".into(),
            tenant_id: None,
        };
        let login = || store.login(&cache, &request, &who, "203.0.113.7", everyone_new);
        // The first login from the owner's network makes it known.
        login().await.unwrap();
        let spend = async |key: &str, quota: Quota| {
            while cache.rate_limit(key, quota).await.unwrap().allowed {}
        };
        let returning = Quota {
            per_minute: everyone_new.per_minute * RETURNING_MULTIPLE,
            burst: everyone_new.burst * RETURNING_MULTIPLE,
        };
        spend(RETURNING_KEY, returning).await;
        login().await.unwrap();
        spend(UNAUTHENTICATED_KEY, everyone_new).await;
        assert!(matches!(login().await, Err(StoreError::TooManyAttempts(_))));
    }
}
