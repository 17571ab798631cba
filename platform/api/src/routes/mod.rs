//! Route table. Each resource answers 405 (in the JSON error shape) for methods it does not serve.

pub mod accounts;
pub mod api_keys;
pub mod audit;
pub mod billing;
pub mod echo;
pub mod health;
pub mod inference;
pub mod members;
pub mod models;
pub mod payments;
pub mod plugins;

use actix_web::middleware::from_fn;
use actix_web::{Resource, web};

use plinth_core::Scope;

use crate::limits::{Door, guard};
use crate::{error, metering};

fn resource(path: &str) -> Resource {
    web::resource(path).default_service(web::to(error::method_not_allowed))
}

/// An unauthenticated route, limited per client address (and globally for sign-up and login).
fn unauthenticated(
    path: &str,
    door: Door,
) -> Resource<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    resource(path).wrap(from_fn(move |req, next| guard(door, req, next)))
}

/// A billable route: authenticated, scope-checked (a stored answer is only replayed to a caller the
/// route would serve), rate limited and made idempotent before the handler runs. A keyed request's
/// body is read up to `max_body` bytes (the JSON limit when `None`) to fingerprint it.
fn metered(
    path: &str,
    scope: Option<Scope>,
    max_body: Option<usize>,
) -> Resource<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    resource(path).wrap(from_fn(move |req, next| {
        metering::middleware(scope, max_body, req, next)
    }))
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(unauthenticated("/v1/signup", Door::Signup).route(web::post().to(accounts::signup)))
        .service(unauthenticated("/v1/login", Door::Login).route(web::post().to(accounts::login)))
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
        .service(unauthenticated("/v1/plans", Door::Public).route(web::get().to(billing::plans)))
        .service(resource("/v1/audit-log").route(web::get().to(audit::list)))
        .service(
            resource("/v1/subscription")
                .route(web::get().to(billing::subscription))
                .route(web::post().to(billing::change_plan))
                .route(web::delete().to(billing::cancel)),
        )
        .service(resource("/v1/invoices").route(web::get().to(billing::invoices)))
        .service(resource("/v1/invoices/upcoming").route(web::get().to(billing::upcoming)))
        .service(resource("/v1/webhooks/stripe").route(web::post().to(payments::stripe_webhook)))
        .service(resource("/v1/author/connect").route(web::post().to(payments::connect)))
        .service(resource("/v1/author/payouts").route(web::get().to(payments::payouts)))
        .service(resource("/v1/admin/payouts").route(web::post().to(payments::run_payouts)))
        .service(resource("/v1/admin/statements/paid").route(web::post().to(payments::mark_paid)))
        .service(resource("/v1/admin/billing/sync").route(web::post().to(payments::sync)))
        .service(resource("/v1/admin/billing/reconciliation").route(web::get().to(payments::reconciliation)))
        .service(resource("/v1/usage").route(web::get().to(billing::usage)))
        .service(metered("/v1/echo", None, None).route(web::post().to(echo::echo)))
        .service(
            resource("/v1/models")
                .route(web::get().to(models::list))
                .route(web::post().to(models::upload)),
        )
        .service(
            resource("/v1/models/{name}")
                .route(web::get().to(models::get))
                .route(web::delete().to(models::delete)),
        )
        .service(
            resource("/v1/models/{name}/versions/{version}").route(web::delete().to(models::delete_version)),
        )
        .service(
            metered("/v1/models/{name}/classify", Some(Scope::Inference), None)
                .route(web::post().to(models::classify)),
        )
        .service(
            metered("/v1/models/{name}/embed", Some(Scope::Inference), None)
                .route(web::post().to(models::embed)),
        )
        .service(resource("/v2/models/{name}").route(web::get().to(inference::metadata)))
        .service(resource("/v2/models/{name}/versions/{version}").route(web::get().to(inference::metadata)))
        .service(resource("/v2/models/{name}/ready").route(web::get().to(inference::ready)))
        .service(resource("/v2/models/{name}/stats").route(web::get().to(inference::statistics)))
        .service(
            resource("/v2/models/{name}/versions/{version}/ready").route(web::get().to(inference::ready)),
        )
        .service(
            metered(
                "/v2/models/{name}/infer",
                Some(Scope::Inference),
                Some(inference::TENSOR_BODY_LIMIT),
            )
            .route(web::post().to(inference::infer)),
        )
        .service(
            metered(
                "/v2/models/{name}/versions/{version}/infer",
                Some(Scope::Inference),
                Some(inference::TENSOR_BODY_LIMIT),
            )
            .route(web::post().to(inference::infer)),
        )
        .service(resource("/v1/plugins").route(web::post().to(plugins::create)))
        .service(resource("/v1/plugins/{name}").route(web::get().to(plugins::get)))
        .service(resource("/v1/plugins/{name}/versions").route(web::post().to(plugins::publish)))
        .service(resource("/v1/marketplace/plugins").route(web::get().to(plugins::marketplace)))
        .service(resource("/v1/admin/plugin-versions").route(web::get().to(plugins::pending)))
        .service(resource("/v1/admin/plugin-versions/{id}/review").route(web::post().to(plugins::review)))
        .service(resource("/v1/admin/plugin-versions/{id}/revoke").route(web::post().to(plugins::revoke)))
        .service(
            resource("/v1/installations")
                .route(web::get().to(plugins::list))
                .route(web::post().to(plugins::install)),
        )
        .service(
            resource("/v1/installations/{id}")
                .route(web::patch().to(plugins::update))
                .route(web::delete().to(plugins::uninstall)),
        )
        .service(
            metered("/v1/installations/{id}/invoke", Some(Scope::Plugins), None)
                .route(web::post().to(plugins::invoke)),
        )
        .service(resource("/v1/author/earnings").route(web::get().to(plugins::earnings)))
        .service(resource("/v2/health/live").route(web::get().to(health::live)))
        .service(resource("/v2/health/ready").route(web::get().to(health::ready)))
        .service(resource("/metrics").route(web::get().to(health::metrics)));
}
