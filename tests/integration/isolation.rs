//! What one tenant sends, uploads or publishes never takes another tenant's calls down: absurd
//! tensors, plugins that hold on to their slot, floods of work. Each test is the attack of THREATS.md;
//! it passes when every other tenant is still served.

use plinth_tests::TestApp;
use serde_json::{Value, json};

const DATATYPES: [&str; 6] = ["FP32", "FP16", "INT64", "INT32", "BOOL", "BYTES"];

/// Shapes that ask for terabytes, overflow, or hide a huge dimension behind a zero.
fn absurd_shapes() -> [Value; 4] {
    [
        json!([1, 1_099_511_627_776_i64]),
        json!([0, 1_099_511_627_776_i64]),
        json!([2_147_483_648_i64, 2_147_483_648_i64, 2_147_483_648_i64]),
        json!([i64::MAX, 2]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_tensor_shapes_are_refused_and_the_server_keeps_serving() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    app.lift_rate_limits(&tenant.session.tenant.id).await;
    let url = app.url("/v2/models/sentiment/infer");
    for datatype in DATATYPES {
        for shape in absurd_shapes() {
            let input = json!({ "name": "input_ids", "datatype": datatype, "shape": shape, "data": [] });
            let as_json = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .json(&json!({ "inputs": [input] }))
                .send()
                .await
                .unwrap();
            assert_eq!(as_json.status(), 400, "{datatype} {shape}");
            let body: Value = as_json.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap_or_default().contains("elements"),
                "{body}"
            );

            // The binary extension: the JSON header claims the shape, no bytes follow.
            let header = json!({ "inputs": [{
                "name": "input_ids", "datatype": datatype, "shape": shape,
                "parameters": { "binary_data_size": 0 },
            }]})
            .to_string();
            let as_binary = app
                .http()
                .post(&url)
                .bearer_auth(&tenant.key.secret)
                .header("Inference-Header-Content-Length", header.len().to_string())
                .header("Content-Type", "application/octet-stream")
                .body(header)
                .send()
                .await
                .unwrap();
            assert_eq!(as_binary.status(), 400, "binary {datatype} {shape}");
        }
    }
    // Still serving, and nothing was billed for the refusals.
    let answer = tenant
        .client
        .classify("sentiment", &["still here"])
        .await
        .unwrap();
    assert_eq!(answer.results.len(), 1);
    let usage = tenant
        .client
        .usage(&plinth_sdk::UsageQuery::default())
        .await
        .unwrap();
    assert_eq!(usage.total.calls, 1);
}

/// A raw plugin invocation (the SDK would retry a `429` by itself).
async fn invoke_raw(
    app: &TestApp,
    tenant: &plinth_tests::TestTenant,
    installation: &plinth_sdk::InstallationId,
    request: Value,
) -> (u16, Value) {
    let response = app
        .http()
        .post(app.url(&format!("/v1/installations/{installation}/invoke")))
        .bearer_auth(&tenant.key.secret)
        .json(&request)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").is_some();
    let body: Value = response.json().await.unwrap();
    if status == 429 {
        assert!(retry_after, "a 429 without Retry-After: {body}");
    }
    (status, body)
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_waiting_in_the_host_is_stopped_at_its_deadline_and_its_tenant_cannot_hold_every_instance() {
    let app = TestApp::spawn_with(|config| config.plugin_deadline_ms = 1_500).await;
    let author = app.tenant().await;
    // Both on the free plan: two plugin instances at once, one per installation.
    let hoarder = app.tenant().await;
    let neighbour = app.tenant().await;
    let hoarded = app.install_plugin(&author, &hoarder, "hostile", json!({})).await;
    let (manifest, _) = plinth_tests::built_plugin("hostile");
    let served = neighbour
        .owner
        .install_plugin(&plinth_sdk::InstallRequest {
            plugin: "hostile".into(),
            version: None,
            approve_capabilities: manifest.capabilities.clone(),
            approve_models: manifest.models.clone(),
            settings: serde_json::Map::default(),
            secrets: std::collections::BTreeMap::default(),
        })
        .await
        .unwrap();

    // The guest sleeps for a minute in a WASI poll: the deadline still holds.
    let started = std::time::Instant::now();
    let sleeper = {
        let (app, hoarder, id) = (&app, &hoarder, hoarded.id.clone());
        async move { invoke_raw(app, hoarder, &id, json!({ "do": "sleep" })).await }
    };
    let hoarding = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // The installation's one instance is taken: the next call is refused at once...
        let (status, body) = invoke_raw(&app, &hoarder, &hoarded.id, json!({ "do": "echo" })).await;
        assert_eq!(
            (status, code(&body)),
            (429, "plugin_concurrency_exceeded"),
            "{body}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1_400),
            "refused only after waiting"
        );
        // ...while another tenant's plugin calls go through.
        for n in 0..3 {
            let (status, body) =
                invoke_raw(&app, &neighbour, &served.id, json!({ "do": "echo", "n": n })).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["n"], n);
        }
    };
    let ((status, body), ()) = tokio::join!(sleeper, hoarding);
    let waited = started.elapsed();
    assert_eq!((status, code(&body)), (504, "plugin_timeout"), "{body}");
    assert!(
        waited >= std::time::Duration::from_millis(1_400) && waited < std::time::Duration::from_secs(4),
        "stopped after {waited:?}"
    );
    // The slot came back with the deadline.
    let (status, body) = invoke_raw(&app, &hoarder, &hoarded.id, json!({ "do": "echo" })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_refuses_a_component_that_crashes_on_every_request_and_limits_submissions() {
    let app = TestApp::spawn_with(plinth_tests::production_limits).await;
    let author = app.tenant().await;
    let (manifest, component) = plinth_tests::built_plugin("crasher");
    author.owner.create_plugin("crasher", "").await.unwrap();
    let err = author
        .owner
        .publish_plugin_version(&manifest, component.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(plinth_sdk::ErrorCode::InvalidPlugin), "{err:?}");
    assert!(err.to_string().contains("the smoke run failed"), "{err}");
    assert!(author.owner.plugin("crasher").await.unwrap().versions.is_empty());

    // Every submission costs a compilation and a run: an author gets two a minute, then 429.
    let submit = || {
        let form = reqwest::multipart::Form::new()
            .part(
                "manifest",
                reqwest::multipart::Part::bytes(serde_json::to_vec(&manifest).unwrap()),
            )
            .part("component", reqwest::multipart::Part::bytes(component.clone()));
        app.http()
            .post(app.url("/v1/plugins/crasher/versions"))
            .bearer_auth(&author.session.token)
            .multipart(form)
            .send()
    };
    assert_eq!(submit().await.unwrap().status(), 422);
    let limited = submit().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
}
