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
pub mod training;

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

/// Declares every route once: `configure` registers them, and `ROUTES` lists them for the test that
/// the OpenAPI document covers each.
macro_rules! route_table {
    ($($make:ident($path:literal $(, $arg:expr)*) { $($method:ident => $handler:path),+ $(,)? })*) => {
        pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
            $(cfg.service($make($path $(, $arg)*)$(.route(web::$method().to($handler)))+);)*
        }

        /// Every route the API serves: (method, path template).
        pub const ROUTES: &[(&str, &str)] = &[$($((stringify!($method), $path),)+)*];
    };
}

route_table! {
    unauthenticated("/v1/signup", Door::Signup) { post => accounts::signup }
    unauthenticated("/v1/login", Door::Login) { post => accounts::login }
    resource("/v1/logout") { post => accounts::logout }
    resource("/v1/tenant") { get => accounts::tenant }
    resource("/v1/api-keys") { get => api_keys::list, post => api_keys::create }
    resource("/v1/api-keys/{id}") { delete => api_keys::revoke }
    resource("/v1/members") { get => members::list, post => members::add }
    resource("/v1/members/{user_id}") { patch => members::update, delete => members::remove }
    unauthenticated("/v1/plans", Door::Public) { get => billing::plans }
    resource("/v1/audit-log") { get => audit::list }
    resource("/v1/subscription") { get => billing::subscription, post => billing::change_plan, delete => billing::cancel }
    resource("/v1/invoices") { get => billing::invoices }
    resource("/v1/invoices/upcoming") { get => billing::upcoming }
    resource("/v1/webhooks/stripe") { post => payments::stripe_webhook }
    resource("/v1/author/connect") { post => payments::connect }
    resource("/v1/author/payouts") { get => payments::payouts }
    resource("/v1/admin/payouts") { post => payments::run_payouts }
    resource("/v1/admin/statements/paid") { post => payments::mark_paid }
    resource("/v1/admin/billing/sync") { post => payments::sync }
    resource("/v1/admin/billing/reconciliation") { get => payments::reconciliation }
    resource("/v1/usage") { get => billing::usage }
    metered("/v1/echo", None, None) { post => echo::echo }
    resource("/v1/models") { get => models::list, post => models::upload }
    resource("/v1/models/{name}") { get => models::get, delete => models::delete }
    resource("/v1/models/{name}/versions/{version}") { delete => models::delete_version }
    metered("/v1/models/{name}/classify", Some(Scope::Inference), None) { post => models::classify }
    metered("/v1/models/{name}/embed", Some(Scope::Inference), None) { post => models::embed }
    resource("/v2/models/{name}") { get => inference::metadata }
    resource("/v2/models/{name}/versions/{version}") { get => inference::version_metadata }
    resource("/v2/models/{name}/ready") { get => inference::ready }
    resource("/v2/models/{name}/versions/{version}/ready") { get => inference::version_ready }
    resource("/v2/models/{name}/stats") { get => inference::statistics }
    resource("/v2/models/{name}/versions/{version}/stats") { get => inference::version_statistics }
    metered("/v2/models/{name}/infer", Some(Scope::Inference), Some(inference::TENSOR_BODY_LIMIT)) { post => inference::infer }
    metered("/v2/models/{name}/versions/{version}/infer", Some(Scope::Inference), Some(inference::TENSOR_BODY_LIMIT)) { post => inference::version_infer }
    resource("/v1/datasets") { get => training::list_datasets, post => training::upload_dataset }
    resource("/v1/datasets/{id}") { get => training::get_dataset, delete => training::delete_dataset }
    resource("/v1/training-jobs") { get => training::list_jobs, post => training::create_job }
    resource("/v1/training-jobs/{id}") { get => training::get_job, delete => training::delete_job }
    resource("/v1/training-jobs/{id}/events") { get => training::events }
    resource("/v1/training-jobs/{id}/cancel") { post => training::cancel }
    resource("/v1/training-jobs/{id}/deploy") { post => training::deploy }
    resource("/v1/training-jobs/{id}/model.onnx") { get => training::export }
    resource("/v1/plugins") { post => plugins::create }
    resource("/v1/plugins/{name}") { get => plugins::get }
    resource("/v1/plugins/{name}/versions") { post => plugins::publish }
    resource("/v1/plugins/{name}/invocations") { get => plugins::invocation_summary }
    resource("/v1/marketplace/plugins") { get => plugins::marketplace }
    resource("/v1/admin/plugin-versions") { get => plugins::pending }
    resource("/v1/admin/plugin-versions/{id}/review") { post => plugins::review }
    resource("/v1/admin/plugin-versions/{id}/revoke") { post => plugins::revoke }
    resource("/v1/installations") { get => plugins::list, post => plugins::install }
    resource("/v1/installations/{id}") { patch => plugins::update, delete => plugins::uninstall }
    metered("/v1/installations/{id}/invoke", Some(Scope::Plugins), None) { post => plugins::invoke }
    resource("/v1/installations/{id}/invocations") { get => plugins::invocations }
    resource("/v1/installations/{id}/invocations/{invocation}/record") { get => plugins::invocation_record }
    resource("/v1/author/earnings") { get => plugins::earnings }
    unauthenticated("/v2", Door::Public) { get => inference::server_metadata }
    resource("/v2/health/live") { get => health::live }
    resource("/v2/health/ready") { get => health::ready }
    resource("/metrics") { get => health::metrics }
}
