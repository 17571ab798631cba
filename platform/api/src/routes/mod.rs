//! Route table. Each resource answers 405 (in the JSON error shape) for methods it does not serve.

pub mod accounts;
pub mod api_keys;
pub mod billing;
pub mod echo;
pub mod health;
pub mod members;

use actix_web::middleware::from_fn;
use actix_web::{Resource, web};

use crate::{error, metering};

fn resource(path: &str) -> Resource {
    web::resource(path).default_service(web::to(error::method_not_allowed))
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/v1/signup").route(web::post().to(accounts::signup)))
        .service(resource("/v1/login").route(web::post().to(accounts::login)))
        .service(resource("/v1/logout").route(web::post().to(accounts::logout)))
        .service(resource("/v1/tenant").route(web::get().to(accounts::tenant)))
        .service(
            resource("/v1/api-keys")
                .route(web::get().to(api_keys::list))
                .route(web::post().to(api_keys::create)),
        )
        .service(resource("/v1/api-keys/{id}").route(web::delete().to(api_keys::revoke)))
        .service(
            resource("/v1/members")
                .route(web::get().to(members::list))
                .route(web::post().to(members::add)),
        )
        .service(
            resource("/v1/members/{user_id}")
                .route(web::patch().to(members::update))
                .route(web::delete().to(members::remove)),
        )
        .service(resource("/v1/plans").route(web::get().to(billing::plans)))
        .service(resource("/v1/subscription").route(web::get().to(billing::subscription)))
        .service(resource("/v1/usage").route(web::get().to(billing::usage)))
        .service(
            resource("/v1/echo")
                .wrap(from_fn(metering::middleware))
                .route(web::post().to(echo::echo)),
        )
        .service(resource("/v2/health/live").route(web::get().to(health::live)))
        .service(resource("/v2/health/ready").route(web::get().to(health::ready)))
        .service(resource("/metrics").route(web::get().to(health::metrics)));
}
