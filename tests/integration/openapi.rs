//! The committed OpenAPI document is the contract: it must match what the server generates and serves.

use plinth_tests::TestApp;

const COMMITTED: &str = include_str!("../../openapi/openapi.json");

#[test]
fn committed_spec_matches_the_code() {
    let generated = plinth_api::openapi::to_json().unwrap();
    assert!(
        generated == COMMITTED,
        "openapi/openapi.json is stale: regenerate it with `cargo run -p plinth-server -- openapi --output openapi/openapi.json`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_spec_and_reference_ui_work() {
    let app = TestApp::spawn().await;
    let http = app.http();
    let served: serde_json::Value = http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
    assert_eq!(served, committed);
    for path in [
        "/v1/signup",
        "/v1/api-keys/{id}",
        "/v1/usage",
        "/v1/echo",
        "/v2/health/ready",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the spec"
        );
    }
    let docs = http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger-ui"));
    // However the path is spelt, the page and its scripts carry the policy (the browser test checks
    // that the page works under it).
    for path in [
        "/docs/",
        "/%64ocs/",
        "/docs/swagger-initializer.js",
        "/%64ocs/swagger-initializer.js",
    ] {
        let response = http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let policy = response
            .headers()
            .get("content-security-policy")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        assert!(policy.contains("script-src 'self'"), "{path}: {policy:?}");
        assert!(response.headers().contains_key("x-frame-options"), "{path}");
    }
}

/// Every route the server registers is documented, and everything documented is served; each operation
/// has its own id (client generators name methods after them).
#[test]
fn the_spec_covers_every_route_with_unique_operation_ids() {
    let spec: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let undocumented: Vec<String> = plinth_api::ROUTES
        .iter()
        .filter(|(method, path)| paths.get(*path).and_then(|p| p.get(*method)).is_none())
        .map(|(method, path)| format!("{} {path}", method.to_uppercase()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the spec: {undocumented:?}"
    );
    let mut ids = Vec::new();
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            assert!(
                plinth_api::ROUTES.contains(&(method.as_str(), path.as_str())),
                "in the spec but not served: {} {path}",
                method.to_uppercase()
            );
            ids.push(operation["operationId"].as_str().unwrap().to_owned());
        }
    }
    let mut repeated = ids.clone();
    repeated.sort();
    let unique = repeated.len();
    repeated.dedup();
    assert_eq!(unique, repeated.len(), "repeated operationIds among {ids:?}");
}

/// Pairs each operationId with the SDK method that calls it: the method must exist (this does not
/// compile otherwise), and an operation missing from the table is listed by the test below.
macro_rules! sdk_methods {
    ($($operation:literal => $method:ident),* $(,)?) => {{
        $(let _ = plinth_sdk::Client::$method;)*
        &[$($operation),*]
    }};
}

#[test]
fn the_sdk_has_a_method_for_each_operation() {
    let covered: &[&str] = sdk_methods! {
        "signup" => signup, "login" => login, "logout" => logout, "get_tenant" => tenant,
        "audit_log" => audit_log,
        "list_api_keys" => api_keys, "create_api_key" => create_api_key, "revoke_api_key" => revoke_api_key,
        "list_members" => members, "add_member" => add_member, "update_member" => update_member,
        "remove_member" => remove_member,
        "list_plans" => plans, "get_subscription" => subscription, "change_plan" => change_plan,
        "cancel_subscription" => cancel_subscription, "usage_report" => usage,
        "list_invoices" => invoices, "upcoming_invoice" => upcoming_invoice,
        "connect_payouts" => connect_payouts, "author_payouts" => payouts, "run_payouts" => run_payouts,
        "sync_usage" => sync_usage, "billing_reconciliation" => reconciliation,
        "mark_statement_paid" => mark_statement_paid,
        "echo" => echo,
        "list_models" => models, "upload_model" => upload_model, "get_model" => model,
        "delete_model" => delete_model, "delete_model_version" => delete_model_version,
        "classify" => classify, "embed" => embed,
        "server_metadata" => server_metadata,
        "model_metadata" => model_metadata, "model_version_metadata" => model_version_metadata,
        "model_ready" => model_ready, "model_version_ready" => model_version_ready,
        "model_statistics" => model_statistics, "model_version_statistics" => model_version_statistics,
        "model_infer" => infer, "model_version_infer" => infer_version,
        "create_plugin" => create_plugin, "get_plugin" => plugin, "publish_plugin_version" => publish_plugin_version,
        "marketplace" => marketplace, "pending_plugin_versions" => pending_plugin_versions,
        "review_plugin_version" => review_plugin_version, "revoke_plugin_version" => revoke_plugin_version,
        "list_installations" => installations, "install_plugin" => install_plugin,
        "update_installation" => update_installation, "uninstall_plugin" => uninstall_plugin,
        "invoke_plugin" => invoke, "author_earnings" => author_earnings,
        "list_invocations" => invocations, "invocation_summary" => invocation_summary,
        "get_invocation_record" => invocation_record,
        "server_live" => live, "server_ready" => ready,
        "upload_dataset" => upload_dataset_bytes, "list_datasets" => datasets, "get_dataset" => dataset,
        "delete_dataset" => delete_dataset, "create_training_job" => create_training_job,
        "list_training_jobs" => training_jobs, "get_training_job" => training_job,
        "list_training_events" => training_events, "cancel_training_job" => cancel_training_job,
        "deploy_training_job" => deploy_training_job, "export_training_job" => export_training_job,
        "delete_training_job" => delete_training_job,
    };
    // Not for applications: Stripe calls its webhook, Prometheus scrapes the metrics.
    let not_for_applications = ["stripe_webhook", "metrics"];
    let spec: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
    let missing: Vec<String> = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|operations| operations.as_object().unwrap().values())
        .map(|operation| operation["operationId"].as_str().unwrap().to_owned())
        .filter(|id| !covered.contains(&id.as_str()) && !not_for_applications.contains(&id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "operations without an SDK method: {missing:?}"
    );
}
