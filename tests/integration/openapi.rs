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
}
