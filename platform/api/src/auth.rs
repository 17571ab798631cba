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
use plinth_store::auth::Principal;

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

/// A verified caller holding the scope `S` requires.
#[derive(Debug)]
pub struct Auth<S: scope::Policy = scope::Any> {
    principal: Arc<Principal>,
    policy: PhantomData<S>,
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

fn check_scope(principal: &Principal, required: Option<Scope>) -> Result<(), ApiError> {
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
            Ok(Self {
                principal,
                policy: PhantomData,
            })
        })
    }
}

/// Refuses anyone but a logged-in platform operator.
pub(crate) fn require_platform_admin(auth: &Principal, what: &str) -> Result<(), ApiError> {
    match auth.actor {
        plinth_store::auth::Actor::User {
            platform_admin: true, ..
        } => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("only a platform admin (logged in) may {what}"),
        )),
    }
}
