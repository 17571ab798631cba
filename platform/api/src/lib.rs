//! The HTTP edge of Plinth: an actix-web application factory, thin handlers over the domain functions in
//! `plinth-store`, one error type, authentication extractors, rate limiting and the OpenAPI document.
//! Only this crate knows actix.

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod error;
mod limits;
mod metering;
pub mod metrics;
mod multipart;
pub mod openapi;
mod plugins;
mod portal;
mod recent_errors;
pub mod request_id;
mod routes;
pub use routes::ROUTES;
pub mod state;
mod training;
mod uploads;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, web};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use crate::error::{ApiError, ApiResult};
pub use crate::metrics::MetricsToken;
pub use crate::recent_errors::RecentErrors;
pub use crate::state::{AbuseLimits, ApiSettings, AppState};
pub use crate::training::{TrainingSettings, spawn_training};

/// Builds the application: routes, body limits, error shapes, request ids and metrics.
pub fn app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max_body = state.settings.max_body_bytes;
    App::new()
        .app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(max_body)
                .error_handler(error::json_error),
        )
        .app_data(web::PayloadConfig::default().limit(max_body))
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .configure(routes::configure)
        .configure(portal::configure)
        .service(web::redirect("/docs", "/docs/"))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi::ApiDoc::openapi()))
        .default_service(web::to(error::route_not_found))
        .wrap(from_fn(reference_headers))
        .wrap(from_fn(row_scope))
        .wrap(from_fn(request_id::middleware))
}

/// What the API reference (`/docs/`), and any other page outside the portal, may load and do in a
/// browser. It shares the portal's origin, and so its session cookie: whatever got into the page
/// could act as the signed-in user, so only its own scripts run (Swagger UI styles its elements
/// inline, and draws icons as data URLs), it talks only to this server, and no other site may frame it.
const REFERENCE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; \
     object-src 'none'";

/// Sets [`REFERENCE_POLICY`] and its companions on every HTML page and script that has no policy of
/// its own (the portal sets a stricter one). Decided by what the response is, not by its path: a
/// path spelt differently (`/%64ocs/`) routes to the same page.
async fn reference_headers(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    use actix_web::http::header::{self, HeaderValue};
    let mut response = next.call(req).await?;
    let page = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/html") || value.contains("javascript"));
    // Whatever the response, a browser takes it for what it says it is.
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if page && !response.headers().contains_key(header::CONTENT_SECURITY_POLICY) {
        let headers = response.headers_mut();
        for (name, value) in [
            (header::CONTENT_SECURITY_POLICY, REFERENCE_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "same-origin"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    Ok(response)
}

/// Handles each request in a row-security scope of its own: every tenant's rows until its caller is
/// verified, only the caller's after (`plinth_store::row_security`).
async fn row_scope(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    plinth_store::row_security::within_request(next.call(req)).await
}
