//! The HTTP edge of Plinth: an actix-web application factory, thin handlers over the domain functions in
//! `plinth-store`, one error type, authentication extractors, rate limiting and the OpenAPI document.
//! Only this crate knows actix.

pub mod auth;
pub mod error;
mod metering;
pub mod metrics;
pub mod openapi;
pub mod request_id;
mod routes;
pub mod state;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, web};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use crate::error::{ApiError, ApiResult};
pub use crate::state::{ApiSettings, AppState};

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
        .service(web::redirect("/docs", "/docs/"))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi::ApiDoc::openapi()))
        .default_service(web::to(error::route_not_found))
        .wrap(from_fn(request_id::middleware))
}
