//! Limits on the routes anyone can call without credentials. Sign-up and login are where an attacker
//! pushes (free accounts, password guessing, and each attempt costs an argon2 hash), so each is
//! limited per client address, and sign-ups and logins from networks new to their account together
//! globally (the store applies that one to logins, which knows the account); public reads are limited
//! per address.
//! Limits live in the shared cache (Redis in production), so they hold across replicas.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{ResponseError, web};
use plinth_store::accounts::UNAUTHENTICATED_KEY;
use plinth_store::cache::Quota;

use crate::client::{Origin, origin};
use crate::error::ApiError;
use crate::state::AppState;

/// Which unauthenticated door a request comes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Door {
    Signup,
    Login,
    /// Public reads (the plans).
    Public,
}

impl Door {
    fn name(self) -> &'static str {
        match self {
            Self::Signup => "signup",
            Self::Login => "login",
            Self::Public => "public",
        }
    }
}

/// An IPv6 /48 may do this many times what one /64 (one address's limit) may.
const SITE_MULTIPLE: u32 = 8;

/// Public reads per client address: generous, only against floods.
const PUBLIC_PER_ADDRESS: Quota = Quota {
    per_minute: 600,
    burst: 100,
};

/// Refuses with `429` when `key` is past `quota`; allows (and counts) when the limiter is unreachable.
pub(crate) async fn check(state: &AppState, key: &str, quota: Quota) -> Result<(), ApiError> {
    match state.cache.rate_limit(key, quota).await {
        Ok(decision) if !decision.allowed => {
            metrics::counter!("plinth_abuse_limited_total", "limit" => key.split(':').next().unwrap_or("").to_owned())
                .increment(1);
            Err(ApiError::rate_limited(decision))
        }
        Ok(_) => Ok(()),
        Err(err) => {
            // Refusing every login because the cache is down would be the worse failure; the password
            // hashers' own queue bound still holds.
            metrics::counter!("plinth_rate_limit_errors_total").increment(1);
            tracing::warn!(error = %err, "rate limiter unavailable; allowing the request");
            Ok(())
        }
    }
}

async fn admit(state: &AppState, door: Door, client: &Origin) -> Result<(), ApiError> {
    let limits = state.settings.limits;
    let address = client.limit_key();
    let per_address = match door {
        Door::Signup => limits.signups_per_address,
        Door::Login => limits.logins_per_address,
        Door::Public => PUBLIC_PER_ADDRESS,
    };
    check(state, &format!("addr-{}:{address}", door.name()), per_address).await?;
    if let Some(site) = client.site_limit_key() {
        let per_site = Quota {
            per_minute: per_address.per_minute.saturating_mul(SITE_MULTIPLE),
            burst: per_address.burst.saturating_mul(SITE_MULTIPLE),
        };
        check(state, &format!("site-{}:{site}", door.name()), per_site).await?;
    }
    // Logins meet the global limit in the store, and only from networks new to their account: a flood
    // from many addresses must not keep returning users out.
    if door == Door::Signup {
        check(state, UNAUTHENTICATED_KEY, limits.unauthenticated_global).await?;
    }
    Ok(())
}

/// Middleware for an unauthenticated route: refuses with `429` and `Retry-After` past its limits.
pub(crate) async fn guard(
    door: Door,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("application state is not registered"))?;
    // A refusal is answered here, inside the request's scope, so its body carries the request id.
    if let Err(refused) = admit(&state, door, &origin(req.request())).await {
        return Ok(req.into_response(refused.error_response()).map_into_right_body());
    }
    Ok(next.call(req).await?.map_into_left_body())
}
