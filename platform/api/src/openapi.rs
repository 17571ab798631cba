//! The OpenAPI document, generated from the handlers. `plinth openapi` prints it; the committed copy in
//! `openapi/openapi.json` is checked against it by the test suite.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{
    accounts, api_keys, audit, billing, echo, health, inference, members, models, payments, plugins, training,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Plinth API",
        description = "Host ONNX models, sell WebAssembly plugins, bill per call. Errors are always \
            `{\"error\": {\"code\", \"message\", \"request_id\"}}`; authenticate with `Authorization: Bearer <key>`. \
            Metered calls take an `Idempotency-Key`: within 24 hours, a retry of the same request gets the \
            first answer back (`Idempotent-Replayed: true`) and is not billed again; the same key with a \
            different request is refused (`422 idempotency_key_reused`).",
        license(name = "Apache-2.0"),
    ),
    paths(
        accounts::signup, accounts::login, accounts::logout, accounts::tenant, audit::list,
        api_keys::list, api_keys::create, api_keys::revoke,
        members::list, members::add, members::update, members::remove,
        billing::plans, billing::subscription, billing::usage, billing::change_plan, billing::cancel,
        billing::invoices, billing::upcoming,
        payments::stripe_webhook, payments::connect, payments::payouts, payments::run_payouts, payments::sync,
        payments::reconciliation, payments::mark_paid,
        echo::echo,
        models::list, models::get, models::upload, models::delete, models::delete_version, models::classify, models::embed,
        inference::server_metadata, inference::metadata, inference::version_metadata, inference::ready,
        inference::version_ready, inference::statistics, inference::version_statistics, inference::infer,
        inference::version_infer,
        plugins::create, plugins::get, plugins::publish, plugins::marketplace, plugins::pending, plugins::review,
        plugins::revoke,
        plugins::install, plugins::list, plugins::update, plugins::uninstall, plugins::invoke, plugins::invocations,
        plugins::invocation_record,
        plugins::invocation_summary, plugins::earnings,
        training::upload_dataset, training::list_datasets, training::get_dataset, training::delete_dataset,
        training::create_job, training::list_jobs, training::get_job, training::events, training::cancel,
        training::deploy, training::export, training::delete_job,
        health::live, health::ready, health::metrics,
    ),
    components(schemas(plinth_core::ErrorCode, plinth_core::Scope, plinth_core::Role, crate::uploads::Manifest)),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Sign-up, login and the caller's tenant"),
        (name = "api keys", description = "Keys for applications, scoped and revocable"),
        (name = "members", description = "People in a tenant and their roles"),
        (name = "billing", description = "Plans, subscription, usage, statements and invoices"),
        (name = "payments", description = "Stripe webhooks, author payouts through Connect, billing operations"),
        (name = "metering", description = "The metered call path"),
        (name = "models", description = "Models and the task endpoints that take text"),
        (name = "inference protocol", description = "Open Inference Protocol v2 (KServe / Triton compatible)"),
        (name = "plugins", description = "The plugin marketplace: publish, review, install, invoke, earnings"),
        (name = "training", description = "Fine-tuning: labelled datasets, training jobs, evaluation, deployment"),
        (name = "operations", description = "Health and metrics"),
    ),
)]
#[derive(Debug)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`plk_live_…`) or a session token from /v1/login (`pls_…`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as committed: pretty JSON with a trailing newline.
///
/// # Errors
/// Only if serialisation fails, which would be a bug in a schema definition.
pub fn to_json() -> Result<String, serde_json::Error> {
    ApiDoc::openapi().to_pretty_json().map(|json| json + "\n")
}
