//! Who is looking at a portal page: a session cookie over the platform's own sessions, expired after
//! a while idle, and forms that only this portal can submit.
//!
//! - The cookie holds a session token (`__Host-`, `HttpOnly`, `Secure`, `SameSite=Lax`); the token is
//!   checked like a bearer token on every request, so a session ended anywhere (logout, revocation) ends
//!   here too. Only sessions the portal opened are accepted: it marks them in the cache with an idle
//!   expiry, refreshed on each request.
//! - Every form carries a per-session CSRF token (derived from the session token, which a page on
//!   another site cannot read), and every unsafe request must come from this origin (`Sec-Fetch-Site`
//!   and `Origin`: at least one, as browsers send). Login and sign-up, before there is a session, rely
//!   on the origin checks.

use std::sync::Arc;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::http::{Method, header};
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::future::LocalBoxFuture;
use plinth_core::{ErrorCode, Scope};
use plinth_store::audit::Who;
use plinth_store::auth::{Actor, Principal};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{PageError, PageResult};
use crate::auth::check_scope;
use crate::client::{Origin, origin};
use crate::error::ApiError;
use crate::state::AppState;

/// The session cookie's name. `__Host-`: only ever set by this host, over a secure connection, for
/// every path (a sibling subdomain cannot plant one). Browsers treat `http://127.0.0.1` and
/// `localhost` as secure, so the embedded default works over plain http there; anywhere else the
/// portal must be served over https.
pub(crate) const COOKIE: &str = "__Host-plinth_session";

fn idle_key(token: &str) -> String {
    format!("portal-session:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// The CSRF token of a session: a hash of its secret token, under a label of its own.
fn csrf_token(session_token: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"plinth portal csrf\0");
    hash.update(session_token.as_bytes());
    hex::encode(hash.finalize())
}

fn state(req: &HttpRequest) -> Result<web::Data<AppState>, PageError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| PageError::from(ApiError::internal("application state is not registered")))
}

/// Marks a session the portal opened, and sends the browser on to `location` with its cookie.
pub(crate) async fn open(state: &AppState, token: &str, location: &str) -> PageResult {
    state
        .cache
        .set(&idle_key(token), b"1", state.settings.portal_idle)
        .await
        .map_err(ApiError::internal)?;
    let cookie = Cookie::build(COOKIE, token.to_owned())
        .path("/")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Lax)
        .finish();
    let mut response = super::see_other(location);
    response.add_cookie(&cookie).map_err(ApiError::internal)?;
    Ok(response)
}

/// A cookie that removes the session cookie.
pub(crate) fn removal() -> Cookie<'static> {
    let mut cookie = Cookie::build(COOKIE, "")
        .path("/")
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Lax)
        .finish();
    cookie.make_removal();
    cookie
}

/// Refuses an unsafe request that a page of another site sent. Browsers send `Sec-Fetch-Site` or
/// `Origin` (or both) with every form post; a request with neither did not come from a browser
/// showing this portal.
pub(crate) fn same_origin(req: &HttpRequest) -> Result<(), PageError> {
    let refused = |why: &str| {
        Err(PageError::from(ApiError::new(
            ErrorCode::InsufficientScope,
            format!("this form was not sent from this site ({why})"),
        )))
    };
    let site = req.headers().get("sec-fetch-site");
    if let Some(site) = site
        && !matches!(site.to_str().unwrap_or_default(), "same-origin" | "none")
    {
        return refused("Sec-Fetch-Site");
    }
    match req.headers().get(header::ORIGIN) {
        Some(sent) => {
            let sent = sent.to_str().unwrap_or_default();
            let host = sent.split_once("://").map(|(_, host)| host);
            if host != Some(req.connection_info().host()) {
                return refused("Origin");
            }
        }
        None if site.is_none() => return refused("no Origin"),
        None => {}
    }
    Ok(())
}

/// A logged-in member of a tenant, on a portal page.
#[derive(Debug)]
pub(crate) struct Visitor {
    pub(crate) principal: Arc<Principal>,
    pub(crate) csrf: String,
    origin: Origin,
}

impl Visitor {
    pub(crate) fn who(&self) -> Who {
        self.origin.who(self.principal.actor_id())
    }

    /// Refuses a form whose CSRF token is missing or not this session's. Compared as hashes: the time
    /// taken says nothing about the expected token.
    pub(crate) fn verify_csrf(&self, sent: Option<&str>) -> Result<(), PageError> {
        let matches =
            sent.is_some_and(|sent| Sha256::digest(sent.as_bytes()) == Sha256::digest(self.csrf.as_bytes()));
        if matches {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::InsufficientScope,
                "this form has expired or did not come from this site; reload the page and try again",
            )
            .into())
        }
    }

    /// Refuses, as a page, a visitor whose role lacks `scope`.
    pub(crate) fn require(&self, scope: Scope) -> Result<(), PageError> {
        check_scope(&self.principal, Some(scope)).map_err(PageError::from)
    }
}

async fn visitor(req: &HttpRequest) -> Result<Visitor, PageError> {
    let logged_out = || PageError::LoggedOut {
        next: req.uri().path().to_owned(),
    };
    let token = req
        .cookie(COOKIE)
        .map(|c| c.value().to_owned())
        .ok_or_else(logged_out)?;
    let state = state(req)?;
    let principal = match state.store.authenticate(&token).await {
        Ok(principal) => principal,
        Err(err @ plinth_store::auth::AuthError::Store(_)) => return Err(ApiError::from(err).into()),
        Err(_) => return Err(logged_out()),
    };
    let Actor::User { .. } = &principal.actor else {
        return Err(logged_out());
    };
    let key = idle_key(&token);
    match state.cache.get(&key).await {
        Ok(Some(_)) => {}
        // Idle too long, a session the portal did not open, or a cache that lost the mark (a replica
        // standing in for Redis): log in again. The session itself is not revoked here, so a cache
        // outage cannot end anyone's sessions.
        Ok(None) => return Err(logged_out()),
        Err(err) => {
            // The absolute expiry still holds; an outage must not log everyone out.
            metrics::counter!("plinth_portal_idle_check_errors_total").increment(1);
            tracing::warn!(error = %err, "cannot check a portal session's idle expiry; allowing it");
        }
    }
    // Pages count against a limit of each member's own, not the tenant's API bucket: whoever holds a
    // leaked key cannot flood the API to lock the tenant's admins out of revoking it.
    let quota = state.settings.limits.unmetered_per_tenant;
    match state
        .cache
        .rate_limit(&format!("portal:{}", principal.actor_id()), quota)
        .await
    {
        Ok(decision) if !decision.allowed => return Err(ApiError::rate_limited(decision).into()),
        Ok(_) => {}
        Err(err) => {
            metrics::counter!("plinth_rate_limit_errors_total").increment(1);
            tracing::warn!(error = %err, "rate limiter unavailable; allowing the page");
        }
    }
    if let Err(err) = state.cache.set(&key, b"1", state.settings.portal_idle).await {
        tracing::warn!(error = %err, "cannot refresh a portal session's idle expiry");
    }
    req.extensions_mut().insert(principal.clone());
    Ok(Visitor {
        csrf: csrf_token(&token),
        principal,
        origin: origin(req),
    })
}

impl FromRequest for Visitor {
    type Error = PageError;
    type Future = LocalBoxFuture<'static, Result<Self, PageError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                same_origin(&req)?;
            }
            visitor(&req).await
        })
    }
}

/// A form a logged-in visitor submitted from this portal: its CSRF token checked, then its fields.
#[derive(Debug)]
pub(crate) struct Posted<T> {
    pub(crate) visitor: Visitor,
    pub(crate) form: T,
}

impl<T: DeserializeOwned + 'static> FromRequest for Posted<T> {
    type Error = PageError;
    type Future = LocalBoxFuture<'static, Result<Self, PageError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let fields = web::Form::<Vec<(String, String)>>::from_request(&req, payload);
        Box::pin(async move {
            same_origin(&req)?;
            let visitor = visitor(&req).await?;
            let invalid = |what: String| PageError::from(ApiError::new(ErrorCode::ValidationFailed, what));
            let fields = fields
                .await
                .map_err(|err| invalid(format!("the form could not be read: {err}")))?
                .into_inner();
            let sent = fields
                .iter()
                .find(|(name, _)| name == "csrf")
                .map(|(_, v)| v.as_str());
            visitor.verify_csrf(sent)?;
            let rest: Vec<&(String, String)> = fields.iter().filter(|(name, _)| name != "csrf").collect();
            let encoded = serde_urlencoded::to_string(&rest).map_err(ApiError::internal)?;
            let form = serde_urlencoded::from_str(&encoded).map_err(|err| invalid(format!("{err}")))?;
            Ok(Self { visitor, form })
        })
    }
}
