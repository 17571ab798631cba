//! Authentication as an extractor. A handler states the scope it needs in its signature, e.g.
//! `Auth<scope::Admin>`, and receives the verified [`Principal`]; it never parses headers itself.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::future::LocalBoxFuture;
use plinth_core::{ErrorCode, Scope};
use plinth_store::audit::Who;
use plinth_store::auth::Principal;

use crate::client::Origin;

use crate::error::ApiError;
use crate::state::AppState;

/// Scope policies for [`Auth`].
pub mod scope {
    use plinth_core::Scope;

    /// What a handler requires of the caller.
    pub trait Policy {
        const REQUIRED: Option<Scope>;
    }

    macro_rules! policies {
        ($($(#[$doc:meta])* $name:ident => $scope:expr),*) => {$(
            $(#[$doc])*
            #[derive(Debug)]
            pub struct $name;
            impl Policy for $name {
                const REQUIRED: Option<Scope> = $scope;
            }
        )*};
    }

    policies!(
        /// Any valid credential of the tenant.
        Any => None,
        Inference => Some(Scope::Inference),
        Plugins => Some(Scope::Plugins),
        BillingRead => Some(Scope::BillingRead),
        Admin => Some(Scope::Admin)
    );
}

/// A verified caller holding the scope `S` requires, and where it calls from.
#[derive(Debug)]
pub struct Auth<S: scope::Policy = scope::Any> {
    principal: Arc<Principal>,
    origin: Origin,
    policy: PhantomData<S>,
}

impl<S: scope::Policy> Auth<S> {
    /// The caller as the audit log records it.
    #[must_use]
    pub fn who(&self) -> Who {
        self.origin.who(self.principal.actor_id())
    }
}

/// Marks a request already counted against a rate limit (metered routes count in their middleware).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateCounted;

/// Counts an authenticated, unmetered request against its tenant's limit for such routes, so a flood
/// of listings or uploads from one tenant cannot take the database from the others. A cache outage
/// lets the request through, as on metered routes.
pub(crate) async fn count_unmetered(req: &HttpRequest, principal: &Principal) -> Result<(), ApiError> {
    if req.extensions().get::<RateCounted>().is_some() {
        return Ok(());
    }
    req.extensions_mut().insert(RateCounted);
    let Some(state) = req.app_data::<web::Data<AppState>>() else {
        return Ok(());
    };
    let quota = state.settings.limits.unmetered_per_tenant;
    match state
        .cache
        .rate_limit(&format!("tenant-api:{}", principal.tenant_id), quota)
        .await
    {
        Ok(decision) if !decision.allowed => Err(ApiError::rate_limited(decision)),
        Ok(_) => Ok(()),
        Err(err) => {
            metrics::counter!("plinth_rate_limit_errors_total").increment(1);
            tracing::warn!(error = %err, "rate limiter unavailable; allowing the request");
            Ok(())
        }
    }
}

impl<S: scope::Policy> Deref for Auth<S> {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

fn bearer_token(req: &HttpRequest) -> Result<String, ApiError> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "send `Authorization: Bearer <API key or session token>`",
        )
    })?;
    let value = value.to_str().unwrap_or_default();
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(token.trim().to_owned())
        }
        _ => Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

pub(crate) fn check_scope(principal: &Principal, required: Option<Scope>) -> Result<(), ApiError> {
    match required {
        Some(scope) if !principal.has(scope) => Err(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("this call needs the `{scope}` scope, which these credentials do not hold"),
        )),
        _ => Ok(()),
    }
}

/// Verifies the request's bearer token, reusing the result if a middleware already did.
pub(crate) async fn authenticate(req: &HttpRequest) -> Result<Arc<Principal>, ApiError> {
    if let Some(principal) = req.extensions().get::<Arc<Principal>>() {
        return Ok(principal.clone());
    }
    let token = bearer_token(req)?;
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("application state is not registered"))?;
    let principal = state.store.authenticate(&token).await?;
    req.extensions_mut().insert(principal.clone());
    Ok(principal)
}

impl<S: scope::Policy + 'static> FromRequest for Auth<S> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let principal = authenticate(&req).await?;
            check_scope(&principal, S::REQUIRED)?;
            count_unmetered(&req, &principal).await?;
            Ok(Self {
                principal,
                origin: crate::client::origin(&req),
                policy: PhantomData,
            })
        })
    }
}

/// Whether the caller is a logged-in platform operator.
pub(crate) fn is_platform_admin(auth: &Principal) -> bool {
    matches!(
        auth.actor,
        plinth_store::auth::Actor::User {
            platform_admin: true,
            ..
        }
    )
}

/// Refuses anyone but a logged-in platform operator. The operator's request may then see every
/// tenant's rows: reviews, the tenant directory and billing operations cross tenants by purpose.
pub(crate) fn require_platform_admin(auth: &Principal, what: &str) -> Result<(), ApiError> {
    if !is_platform_admin(auth) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("only a platform admin (logged in) may {what}"),
        ));
    }
    plinth_store::row_security::open_to_operator();
    Ok(())
}
