use plinth_tests::TestApp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer() {
    let app = TestApp::spawn().await;
    let http = app.http();
    let live: Value = http
        .get(app.url("/v2/health/live"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live, json!({ "live": true }));
    assert!(app.client().ready().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_for_prometheus() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    tenant.client.echo(&json!({})).await.unwrap();
    let text = app
        .http()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("http_requests_total{method=\"POST\",route=\"/v1/echo\",status=\"200\"}"),
        "{text}"
    );
    assert!(text.contains("http_request_duration_seconds_bucket"));
    assert!(text.contains("plinth_ledger_batch_size_bucket"));
}
