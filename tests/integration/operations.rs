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
async fn metrics_are_exposed_for_prometheus_to_the_token_holder_only() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    tenant.client.echo(&json!({})).await.unwrap();
    let text = app.metrics().await;
    assert!(
        text.contains("http_requests_total{method=\"POST\",route=\"/v1/echo\",status=\"200\"}"),
        "{text}"
    );
    assert!(text.contains("http_request_duration_seconds_bucket"));
    assert!(text.contains("plinth_ledger_batch_size_bucket"));

    let http = app.http();
    let anonymous = http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    for wrong in [
        &tenant.key.secret,
        &tenant.session.token,
        "metrics-token-for-test",
    ] {
        let response = http
            .get(app.url("/metrics"))
            .bearer_auth(wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{wrong}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_metrics_are_only_on_their_own_listener() {
    let port = plinth_tests::unshared_port();
    let app = TestApp::spawn_with(|config| {
        config.metrics_token = None;
        config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    })
    .await;
    let http = app.http();
    for token in [None, Some(plinth_tests::METRICS_TOKEN)] {
        let mut request = http.get(app.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 404);
    }
    let own = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    assert!(own.text().await.unwrap().contains("http_requests_total"));
    // Only metrics there: the API is not reachable through the monitoring port.
    let api = http
        .get(format!("http://127.0.0.1:{port}/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels_carry_no_tenant_names_and_no_client_chosen_values() {
    let app = TestApp::spawn().await;
    let tenant = app.tenant().await;
    // A method of the client's invention and a path nobody routes.
    let http = app.http();
    let odd = reqwest::Method::from_bytes(b"SECRETMETHOD").unwrap();
    http.request(odd, app.url("/v1/private-tenant-path-xyz"))
        .send()
        .await
        .unwrap();
    let upload = crate::models::upload_sentiment_copy(&app, &tenant, "acme-secret-model").await;
    assert_eq!(upload, 201);
    let classify = tenant
        .client
        .classify("acme-secret-model", &["Profits doubled"])
        .await;
    assert!(classify.is_ok(), "{classify:?}");
    let text = app.metrics().await;
    for private in [
        "SECRETMETHOD",
        "private-tenant-path-xyz",
        "acme-secret-model",
        tenant.session.tenant.id.to_string().as_str(),
    ] {
        assert!(!text.contains(private), "`{private}` is in the metrics");
    }
    assert!(
        text.contains("nv_inference_exec_count{model=\"tenant\"}"),
        "{text}"
    );
}
