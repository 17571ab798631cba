//! Every templated route of the committed OpenAPI document, called by one tenant (with every scope, as
//! an owner) with another tenant's ids, answers 404 and changes nothing: a tenant cannot even learn
//! that another's resources exist. The routes and their bodies come from `openapi/openapi.json`, so a
//! new route is covered without editing this test; a route with a path parameter this test cannot
//! fill fails it until `victims_id` learns the parameter.

use plinth_tests::{TestApp, TestTenant, built_plugin};
use serde_json::{Map, Value, json};

const SPEC: &str = include_str!("../../openapi/openapi.json");

/// The victim's resources, one of each kind a path can name.
struct Victim {
    key_id: String,
    user_id: String,
    model: String,
    plugin: String,
    plugin_version: String,
    installation: String,
    invocation: String,
    dataset: String,
    training_job: String,
}

/// The victim's id for `param` in `path`, by the resource the path is about.
fn victims_id<'a>(victim: &'a Victim, path: &str, param: &str) -> Option<&'a str> {
    let resource = path.split('/').nth(2).unwrap_or_default();
    Some(match (resource, param) {
        ("api-keys", "id") => &victim.key_id,
        ("members", "user_id") => &victim.user_id,
        ("models", "name") => &victim.model,
        ("models", "version") => "1",
        ("plugins", "name") => &victim.plugin,
        ("admin", "id") => &victim.plugin_version,
        ("installations", "id") => &victim.installation,
        ("installations", "invocation") => &victim.invocation,
        ("datasets", "id") => &victim.dataset,
        ("training-jobs", "id") => &victim.training_job,
        _ => return None,
    })
}

/// A minimal valid instance of `schema`: what a well-formed request would send, so that the answer
/// is about whose resource it is, not about the body.
fn instance(schema: &Value, spec: &Value) -> Value {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.trim_start_matches("#/components/schemas/");
        return instance(&spec["components"]["schemas"][name], spec);
    }
    if let Some(example) = schema.get("example") {
        return example.clone();
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values.first().cloned().unwrap_or(Value::Null);
    }
    for combinator in ["oneOf", "anyOf"] {
        if let Some(first) = schema
            .get(combinator)
            .and_then(Value::as_array)
            .and_then(|s| s.first())
        {
            return instance(first, spec);
        }
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in parts {
            if let Value::Object(fields) = instance(part, spec) {
                merged.extend(fields);
            }
        }
        return Value::Object(merged);
    }
    let kind = match &schema["type"] {
        Value::Array(kinds) => kinds
            .iter()
            .find(|k| *k != "null")
            .and_then(Value::as_str)
            .unwrap_or("object"),
        Value::String(kind) => kind.as_str(),
        _ => "object",
    };
    match kind {
        "string" => json!("x"),
        "integer" => schema.get("minimum").cloned().unwrap_or(json!(1)),
        "number" => json!(1.0),
        "boolean" => json!(false),
        "array" => json!([instance(&schema["items"], spec)]),
        _ => {
            let mut fields = Map::new();
            let required = schema["required"].as_array().cloned().unwrap_or_default();
            for name in required.iter().filter_map(Value::as_str) {
                fields.insert(name.to_owned(), instance(&schema["properties"][name], spec));
            }
            Value::Object(fields)
        }
    }
}

async fn victim(app: &TestApp) -> (TestTenant, Victim) {
    let tenant = app.tenant().await;
    let model = "victims-private-model".to_owned();
    assert_eq!(
        crate::models::upload_sentiment_copy(app, &tenant, &model).await,
        201
    );
    // A plugin of the victim's that is listed, with a version waiting for review, never approved.
    let (mut manifest, component) = built_plugin("hello");
    manifest.name = "victims-unreviewed-plugin".to_owned();
    tenant
        .owner
        .create_plugin(&manifest.name, "unreviewed")
        .await
        .unwrap();
    let pending = tenant
        .owner
        .publish_plugin_version(&manifest, component)
        .await
        .unwrap();
    let installation = app.install_plugin(&tenant, &tenant, "hello", json!({})).await;
    // An invocation recorded in full, whose record the victim can read.
    let (_, invocation) = tenant
        .client
        .invoke_recorded(&installation.id, &json!({ "name": "victim" }))
        .await
        .unwrap();
    let invocation = invocation.expect("an invocation id");
    let mut readable = false;
    for _ in 0..200 {
        if tenant
            .client
            .invocation_record(&installation.id, &invocation)
            .await
            .is_ok()
        {
            readable = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(readable, "the victim's recorded invocation");
    // A dataset of the victim's, and a job training on it.
    let examples: String = ["refund", "login"]
        .iter()
        .flat_map(|label| {
            (0..10).map(move |i| format!("{{\"text\": \"{label} question {i}\", \"label\": \"{label}\"}}\n"))
        })
        .collect();
    let dataset = tenant
        .owner
        .upload_dataset_bytes("victim.jsonl", examples.into_bytes(), Some("victim's data"))
        .await
        .unwrap();
    let training_job = tenant
        .owner
        .create_training_job(&plinth_sdk::NewTrainingJob {
            dataset: dataset.id.clone(),
            model: "victims-trained".to_owned(),
            base_model: None,
            hyperparameters: plinth_sdk::Hyperparameters::default(),
        })
        .await
        .unwrap();
    let victim = Victim {
        dataset: dataset.id,
        training_job: training_job.id,
        invocation: invocation.to_string(),
        key_id: tenant.key.key.id.to_string(),
        user_id: tenant.session.user.id.to_string(),
        model,
        plugin: manifest.name,
        plugin_version: pending.id.to_string(),
        installation: installation.id.to_string(),
    };
    (tenant, victim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_templated_route_answers_404_for_another_tenants_ids() {
    let spec: Value = serde_json::from_str(SPEC).unwrap();
    let app = TestApp::spawn().await;
    let (victim_tenant, victim) = victim(&app).await;
    let attacker = app.tenant().await;
    app.lift_rate_limits(&attacker.session.tenant.id).await;
    let http = app.http();

    let mut failures = Vec::new();
    let mut checked = 0;
    for (template, operations) in spec["paths"].as_object().unwrap() {
        if !template.contains('{') {
            continue;
        }
        let mut path = template.clone();
        for param in template
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split('}').next())
        {
            let Some(id) = victims_id(&victim, template, param) else {
                failures.push(format!(
                    "{template}: no victim's id for `{param}`: teach `victims_id`"
                ));
                continue;
            };
            path = path.replace(&format!("{{{param}}}"), id);
        }
        for (method, operation) in operations.as_object().unwrap() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            // The attacker's strongest credentials: an owner's session for admin routes, else the key
            // with every scope.
            let admin = operation["security"].to_string().contains("admin");
            let token = if admin {
                &attacker.session.token
            } else {
                &attacker.key.secret
            };
            let mut request = http.request(method.clone(), app.url(&path)).bearer_auth(token);
            let content = &operation["requestBody"]["content"];
            if let Some(schema) = content.get("application/json").map(|c| &c["schema"]) {
                request = request.json(&instance(schema, &spec));
            } else if content.get("multipart/form-data").is_some() {
                // A well-formed submission of a version of the plugin the path names.
                let (mut manifest, component) = built_plugin("hello");
                manifest.name = victim.plugin.clone();
                let form = reqwest::multipart::Form::new()
                    .part(
                        "manifest",
                        reqwest::multipart::Part::text(serde_json::to_string(&manifest).unwrap()),
                    )
                    .part(
                        "component",
                        reqwest::multipart::Part::bytes(component).file_name("hello.wasm"),
                    );
                request = request.multipart(form);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            // Platform administration is closed to tenants altogether.
            let expected = if template.starts_with("/v1/admin/") {
                403
            } else {
                404
            };
            if status != expected {
                let body = response.text().await.unwrap_or_default();
                failures.push(format!(
                    "{method} {template}: {status}, expected {expected}: {body}"
                ));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} calls:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 18, "only {checked} templated operations in the spec");

    // Nothing of the victim's changed.
    let owner = &victim_tenant.owner;
    assert!(
        owner
            .api_keys()
            .await
            .unwrap()
            .iter()
            .any(|k| k.id == victim_tenant.key.key.id && k.revoked_at.is_none())
    );
    assert!(
        owner
            .members()
            .await
            .unwrap()
            .iter()
            .any(|m| m.user_id == victim_tenant.session.user.id)
    );
    assert!(
        owner
            .models()
            .await
            .unwrap()
            .iter()
            .any(|m| m.name == victim.model)
    );
    assert_eq!(owner.installations().await.unwrap().len(), 1);
    assert_eq!(
        owner.datasets().await.unwrap().len(),
        1,
        "the victim's dataset is still there"
    );
    let job = owner.training_job(&victim.training_job).await.unwrap();
    assert_ne!(
        job.status,
        plinth_sdk::TrainingStatus::Cancelled,
        "not cancelled by the attacker"
    );
    assert_eq!(job.deployed_version, None, "not deployed by the attacker");
    let versions = app
        .platform_admin()
        .await
        .pending_plugin_versions()
        .await
        .unwrap();
    assert!(
        versions.iter().any(|v| v.id.to_string() == victim.plugin_version),
        "still pending review"
    );
}
